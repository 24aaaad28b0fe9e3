"""megavla.eval"""
