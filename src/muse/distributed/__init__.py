"""muse.distributed"""
