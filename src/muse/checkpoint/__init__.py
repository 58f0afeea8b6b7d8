"""muse.checkpoint"""
