"""synthpath.train"""
