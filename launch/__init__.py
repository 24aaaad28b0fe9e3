"""megavla.launch"""
