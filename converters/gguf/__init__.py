"""GGUF (what llama.cpp loads, SPEC sec. 12): the export plan and its one name table (:mod:`.plan`), the
metadata llama.cpp's converter writes (:mod:`.metadata`), the streaming writer (:mod:`.export`); and reading
back: the file names (:mod:`.files`), the gate, config-from-metadata and dequantized tensors (:mod:`.read`),
``load_model(x.gguf)`` (:mod:`.load`) and ``inspect x.gguf`` (:mod:`.report`). Everything goes through the
``gguf`` package (GGUFWriter, gguf.quants, TensorNameMap, SpecialVocab, GGUFReader)."""
