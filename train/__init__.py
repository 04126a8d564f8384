"""brainrecon.train"""
