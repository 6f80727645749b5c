"""synthpath.generate"""
