"""muse.cli"""
