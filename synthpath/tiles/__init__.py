"""synthpath.tiles"""
