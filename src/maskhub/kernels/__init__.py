"""The diff kernels: exact bit-pattern classification of float formats (:mod:`.floatbits`),
numpy and numba chunk kernels (:mod:`.fastkernel`, :mod:`.numbakernel`), the CUDA kernel
(:mod:`.gpukernel`, the only one importing torch), the :class:`~.kernel.DiffKernel` that
picks one, and the device choice (:mod:`.device`)."""
