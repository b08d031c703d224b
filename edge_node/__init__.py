"""The edge daemon (``cleave-edge``): runs the head locally and the tail in the cloud.

:mod:`edge_node.runtime` decides where each request runs and falls back to local execution;
:mod:`edge_node.cloud_link` keeps a session and a pipelined ``Infer`` stream to the cloud alive;
:mod:`edge_node.servicer` adapts them to the ``Edge`` service for local apps.
"""
