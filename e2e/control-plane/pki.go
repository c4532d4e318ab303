package main

// The cluster's certificates and keys, written as kubeadm lays them out: one cluster CA that
// signs the API server's serving certificate and every client certificate (admin, controller
// manager, scheduler, the API server's kubelet client), a front-proxy CA for the aggregation
// layer, and the service-account signing key.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey() (crypto.Signer, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

func serial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
}

// sign makes a certificate from template for a new key, signed by parent (itself when nil).
func sign(template *x509.Certificate, parent *keyPair) (*keyPair, error) {
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	if template.SerialNumber, err = serial(); err != nil {
		return nil, err
	}
	template.NotBefore = time.Now().Add(-time.Hour)
	issuer, signer := template, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, template, issuer, key.Public(), signer)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &keyPair{cert: cert, key: key}, nil
}

func newCA(name string) (*keyPair, error) {
	return sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: name},
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil)
}

// issue signs a leaf certificate: a client certificate when hosts is empty, else a serving one
// for those DNS names and IPs.
func (ca *keyPair) issue(commonName string, organizations []string, hosts []string) (*keyPair, error) {
	template := &x509.Certificate{
		Subject:     pkix.Name{CommonName: commonName, Organization: organizations},
		NotAfter:    time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if len(hosts) > 0 {
		template.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				template.IPAddresses = append(template.IPAddresses, ip)
			} else {
				template.DNSNames = append(template.DNSNames, h)
			}
		}
	}
	return sign(template, ca)
}

func (kp *keyPair) certPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: kp.cert.Raw})
}

func keyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// write stores <name>.crt and <name>.key under dir.
func (kp *keyPair) write(dir, name string) error {
	keyBytes, err := keyPEM(kp.key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), kp.certPEM(), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".key"), keyBytes, 0o600)
}

// pki is every file the components are started with.
type pki struct {
	dir string
	ca  *keyPair
	// client certificates by file name, for the kubeconfigs
	clients map[string]*keyPair
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// clientIdentities are the client certificates issued by the cluster CA: file name, user, groups.
var clientIdentities = []struct {
	file, user string
	groups     []string
}{
	{"admin", "kubernetes-admin", []string{"system:masters"}},
	{"controller-manager", "system:kube-controller-manager", nil},
	{"scheduler", "system:kube-scheduler", nil},
	{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}},
}

func writePKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir, clients: map[string]*keyPair{}}
	ca, err := newCA("ec2-kubelet-e2e-ca")
	if err != nil {
		return nil, err
	}
	p.ca = ca
	if err := ca.write(dir, "ca"); err != nil {
		return nil, err
	}
	serving, err := ca.issue("kube-apiserver", nil, []string{
		"127.0.0.1", "::1", "10.0.0.1", "localhost",
		"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
	})
	if err != nil {
		return nil, err
	}
	if err := serving.write(dir, "apiserver"); err != nil {
		return nil, err
	}
	for _, id := range clientIdentities {
		kp, err := ca.issue(id.user, id.groups, nil)
		if err != nil {
			return nil, err
		}
		if err := kp.write(dir, id.file); err != nil {
			return nil, err
		}
		p.clients[id.file] = kp
	}
	frontProxyCA, err := newCA("ec2-kubelet-e2e-front-proxy-ca")
	if err != nil {
		return nil, err
	}
	if err := frontProxyCA.write(dir, "front-proxy-ca"); err != nil {
		return nil, err
	}
	frontProxyClient, err := frontProxyCA.issue("front-proxy-client", nil, nil)
	if err != nil {
		return nil, err
	}
	if err := frontProxyClient.write(dir, "front-proxy-client"); err != nil {
		return nil, err
	}
	saKey, err := newKey()
	if err != nil {
		return nil, err
	}
	saKeyBytes, err := keyPEM(saKey)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, fmt.Errorf("service-account public key: %w", err)
	}
	if err := os.WriteFile(p.path("sa.key"), saKeyBytes, 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.path("sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}), 0o644); err != nil {
		return nil, err
	}
	return p, nil
}
