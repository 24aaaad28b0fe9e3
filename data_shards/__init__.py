"""megavla.data_shards"""
