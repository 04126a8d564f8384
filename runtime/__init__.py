"""brainrecon.runtime"""
