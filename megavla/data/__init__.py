"""megavla.data"""
