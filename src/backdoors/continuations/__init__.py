"""continuations"""
