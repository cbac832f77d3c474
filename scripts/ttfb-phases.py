"""Cold time-to-first-byte, split into phases by the mount's own metrics.

  AWS_ENDPOINT_URL_S3=… AWS_ENDPOINT_URL_KMS=… SRC_FILE=… python3 scripts/ttfb-phases.py

Seals the first 256 MiB of SRC_FILE into s3://ttfb/ under a new KMS key, then 5 times:
mount (release build), drop the page cache, open + read 1 byte, and print the wall times
next to the per-operation latency sums scraped from --metrics-addr. Needs root (drop_caches).
"""
import boto3, os, subprocess, time, urllib.request, re, sys
moto=os.environ["AWS_ENDPOINT_URL_KMS"]; s3e=os.environ["AWS_ENDPOINT_URL_S3"]
s3=boto3.client("s3", endpoint_url=s3e); kms=boto3.client("kms", endpoint_url=moto)
try: s3.create_bucket(Bucket="ttfb")
except Exception as e: pass
key=kms.create_key()["KeyMetadata"]["Arn"]
src="/tmp/ttfb-src"; os.makedirs(src, exist_ok=True)
with open(os.environ["SRC_FILE"],"rb") as f, open(src+"/w.bin","wb") as o: o.write(f.read(256<<20))
env=dict(os.environ, AWS_ENDPOINT_URL_S3=s3e, AWS_ENDPOINT_URL_KMS=moto)
b=os.environ.get("SEALFS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),"..","target","release","sealfs")
subprocess.run([b,"seal",src,"s3://ttfb/","--key","kms:"+key,"--force"],env=env,check=True,stdout=subprocess.DEVNULL)
mnt="/tmp/ttfb-mnt"; os.makedirs(mnt, exist_ok=True)
def scrape():
    t=urllib.request.urlopen("http://127.0.0.1:9477/metrics").read().decode()
    out={}
    for l in t.splitlines():
        m=re.match(r'(sealfs_request_seconds_(sum|count)\{service="(\w+)",op="(\w+)"\}|sealfs_fuse_op_seconds_(sum|count)\{op="(\w+)"\}|sealfs_chunk_fetch_seconds_(sum|count)) (\S+)',l)
        if m: out[m.group(1)]=float(m.group(8))
    return out
for rep in range(5):
    p=subprocess.Popen([b,"mount","--foreground","s3://ttfb/",mnt,"--key","kms:"+key,"--metrics-addr","127.0.0.1:9477"],env=env,stderr=subprocess.DEVNULL)
    for _ in range(200):
        if os.path.ismount(mnt): break
        time.sleep(0.05)
    time.sleep(0.3)
    os.sync(); open("/proc/sys/vm/drop_caches","w").write("3")
    before=scrape()
    t=time.perf_counter(); f=open(mnt+"/w.bin","rb"); t1=time.perf_counter(); f.read(1); t2=time.perf_counter(); f.close()
    after=scrape()
    d={k:after[k]-before.get(k,0) for k in after if after[k]-before.get(k,0)>0}
    sums={k.replace("sealfs_",""):round(v*1000,1) for k,v in d.items() if "_sum" in k}
    print(f"rep{rep}: open {1000*(t1-t):.1f} ms, first read {1000*(t2-t1):.1f} ms, total {1000*(t2-t):.1f} ms; in-daemon sums (ms): {sums}")
    p.terminate(); p.wait()
