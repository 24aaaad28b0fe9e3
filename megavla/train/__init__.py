"""megavla.train"""
