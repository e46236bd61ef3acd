"""memory_graph"""
