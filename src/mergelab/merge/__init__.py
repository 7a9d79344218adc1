"""Merging: one registry of methods, and the pieces they are composed of."""

from mergelab.merge.registry import METHODS, MergeResult, get_method, list_methods, merge, register_method

__all__ = ["METHODS", "MergeResult", "get_method", "list_methods", "merge", "register_method"]
