"""tcprepair"""
