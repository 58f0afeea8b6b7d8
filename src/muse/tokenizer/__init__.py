"""muse.tokenizer"""
