"""muse.infer"""
