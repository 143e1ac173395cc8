"""Caffe model I/O; ``caffe_pb2`` is the schema compiled from ``caffe.proto`` (BVLC + Intel + SSD)."""

from calibrator.caffe import caffe_pb2

__all__ = ["caffe_pb2"]
