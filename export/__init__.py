"""brainrecon.export"""
