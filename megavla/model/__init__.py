"""megavla.model"""
