"""muse.eval"""
