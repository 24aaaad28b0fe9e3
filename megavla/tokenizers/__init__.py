"""megavla.tokenizers"""
