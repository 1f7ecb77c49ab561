"""The one compiled part of colo-pipeline: pipeline._pagehash (csrc/pagehash.c), blake3 of
many pages in one call over the vendored official C implementation (csrc/blake3). Every
other setting is in pyproject.toml."""
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

B3 = "csrc/blake3/"
sources = ["csrc/pagehash.c", B3 + "blake3.c", B3 + "blake3_dispatch.c",
           B3 + "blake3_portable.c"]
macros = []
if platform.machine() in ("x86_64", "AMD64"):
    # the SIMD kernels as assembly: no per-file -mavx512f, and blake3_dispatch picks the
    # widest one this CPU has at run time
    sources += [B3 + f"blake3_{isa}_x86-64_unix.S" for isa in ("sse2", "sse41", "avx2", "avx512")]
else:
    macros += [(f"BLAKE3_NO_{isa}", "1") for isa in ("SSE2", "SSE41", "AVX2", "AVX512")]


class BuildExt(build_ext):
    def build_extensions(self):
        self.compiler.src_extensions.append(".S")   # gcc assembles them (with cpp)
        super().build_extensions()


setup(ext_modules=[Extension("pipeline._pagehash", sources, include_dirs=[B3],
                             define_macros=macros, extra_compile_args=["-O3"])],
      cmdclass={"build_ext": BuildExt})
