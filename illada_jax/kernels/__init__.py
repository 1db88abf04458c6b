"""Pallas attention kernels (TPU and GPU) behind `attention_impl` 'pallas' / 'splash'.

See docs/kernels.md for the design (tiling, GQA rows, mask codes, block sizes).
"""
