"""Where state outside one process lives: shared memory for an instance's workers, Redis for the fleet.

The bottom layer of the app: it imports nothing else from it. Every backend error leaves a storage
as `StorageError` (errors.py); the policies and stores above decide what a failure means.
"""
