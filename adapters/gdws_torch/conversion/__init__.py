"""Conversion: which convolutions, with which error weights, for which budget (MACs,
measured speed, beta), and the named recipes that run it end to end.
"""
