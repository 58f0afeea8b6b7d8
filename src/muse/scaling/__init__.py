"""muse.scaling"""
