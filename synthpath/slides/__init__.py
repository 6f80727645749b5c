"""synthpath.slides"""
