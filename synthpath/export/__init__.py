"""synthpath.export"""
