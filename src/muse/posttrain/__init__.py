"""muse.posttrain"""
