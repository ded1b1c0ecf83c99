"""`python -m proto`: regenerate proto/ddm_pb2.py and proto/ddm_pb2_grpc.py from proto/ddm.proto."""

from proto import regenerate

if __name__ == "__main__":
    for path in regenerate():
        print(path)
