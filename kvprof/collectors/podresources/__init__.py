"""kubelet pod-resources v1 API: the shipped proto, its generated stubs and a List client.

``api.proto`` is the kubelet's ``k8s.io/kubelet/pkg/apis/podresources/v1/api.proto``.
``api_pb2.py`` / ``api_pb2_grpc.py`` are generated, committed, and deliberately made with an
OLD grpcio-tools: 1.62.3 emits protobuf 4.25 gencode with no runtime-version check, so the
stubs import on any protobuf >= 4.25 (4.25 .. 7.x tested) and grpcio >= 1.62, i.e. inside the
existing vLLM images kvprof is pip-installed into (newer grpcio-tools would pin both to the
generator's version). Regenerate from the repository root, in a throwaway venv:

    python3 -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.62.3
    /tmp/gt/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \\
        kvprof/collectors/podresources/api.proto
"""
