"""Shared pieces of the example trainers: data, caching, objectives, the accelerate loop, resume and saving.

Each trainer script tells its story top to bottom; the helpers here are the parts both stories share.
"""
