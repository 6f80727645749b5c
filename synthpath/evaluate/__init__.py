"""synthpath.evaluate"""
