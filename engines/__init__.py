"""Pure engines: plain Python with no Django imports, testable alone.

Django code calls into these; they never call back into Django.
"""
