"""muse.data"""
