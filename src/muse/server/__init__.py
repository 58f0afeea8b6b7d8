"""muse.server"""
