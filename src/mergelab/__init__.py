"""mergelab: make better language models out of existing ones.

The package is organised around one streaming engine (``mergelab.engine``) that builds a
new checkpoint tensor by tensor; every capability is a planner that tells it what to make.
Imports here stay light so that ``mergelab --help`` answers at once.
"""

__version__ = "0.1.0"
