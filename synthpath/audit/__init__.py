"""synthpath.audit"""
