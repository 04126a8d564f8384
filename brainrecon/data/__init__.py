"""Readers and generators for fMRI data in the NSD layout."""
