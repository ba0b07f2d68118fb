"""osbc"""
