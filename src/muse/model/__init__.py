"""muse.model"""
