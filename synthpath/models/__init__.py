"""synthpath.models"""
