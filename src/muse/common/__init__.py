"""muse.common"""
