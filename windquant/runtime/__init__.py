"""The runtime: a loaded checkpoint computed by torch's int4 / int8 kernels, weights kept packed.

* :mod:`.int4` maps every packed unit of up to 4 bits onto the int4 kernel's codes exactly;
* :mod:`.linear` is the fast module of one packed linear, :mod:`.embedding` the row-quantized
  embedding and head, :mod:`.convert` swaps them in;
* :mod:`.loading` is where every model spec and checkpoint folder is loaded.
"""
