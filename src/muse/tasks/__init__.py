"""muse.tasks"""
