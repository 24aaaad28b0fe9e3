"""megavla.kernels"""
