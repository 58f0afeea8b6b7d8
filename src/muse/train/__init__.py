"""muse.train"""
