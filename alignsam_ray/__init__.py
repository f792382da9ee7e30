"""alignsam_ray"""
